export PS1="mobykit# "
